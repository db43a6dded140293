"""The LRU memos behind the client's page keys and the GPU plane's per-batch tables."""

from __future__ import annotations

import numpy as np

from kvstore.memo import IdentityMemo, LruMemo


def test_lru_memo_keeps_the_most_recently_used() -> None:
    memo = LruMemo(2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # "a" is now the most recent
    memo.put("c", 3)
    assert memo.get("b") is None and memo.get("a") == 1 and memo.get("c") == 3


def test_identity_memo_answers_only_for_the_very_object() -> None:
    memo = IdentityMemo(4)
    batch = np.arange(3)
    equal = np.arange(3)
    memo.put(batch, "tables")
    assert memo.get(batch) == "tables"
    assert memo.get(equal) is None  # equal contents, another object
    del batch  # the memo holds it: its id cannot be handed to a new object meanwhile
    assert memo.get(np.arange(3)) is None
