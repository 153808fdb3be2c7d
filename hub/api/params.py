"""Bounds of the integers the operator API accepts (paths, queries, bodies).

Versions, ids and counts end up in SQL. SQLite's INTEGER is 64-bit and PostgreSQL's is 32-bit
(the registry's version columns and every serial id), so a larger number is not a missing row:
the driver raises (OverflowError on SQLite, NumericValueOutOfRange on PostgreSQL) and the
caller got a 500. Bounded here, such a request is a 422 that says the range, and no number
out of range reaches the database. Found by the OpenAPI fuzzer (tests/hub/test_api_fuzz.py).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

INT_MAX = 2**31 - 1  # PostgreSQL INTEGER: model versions, serial ids
BIGINT_MAX = 2**63 - 1  # BIGINT (and SQLite's INTEGER): counts such as min_requests, limits

Version = Annotated[int, Path(ge=1, le=INT_MAX)]
RowId = Annotated[int, Path(ge=1, le=INT_MAX)]
VersionQuery = Annotated[int | None, Query(ge=1, le=INT_MAX)]
