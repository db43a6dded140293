"""The storage node: owns tier regions, tracks what each slot holds, serves the data plane.

It never decides placement (the master does); it applies the master's slot
updates, checks every data-plane request against a master-signed grant and
moves the bytes.
"""
