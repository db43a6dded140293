"""The ``kvstore`` admin command line (entry point :func:`kvstore.cli.main.main`)."""
