"""The one progress-callback type of the library (ground floor: imports nothing of mmrobust).

Long computations take ``progress: ProgressFn | None`` and call ``progress(description, done,
total)``; the CLI draws a bar from it, Python callers pass their own function or nothing. Messages
that are not a count (an epoch summary, a stage that starts) go to a :data:`MessageFn`.
"""

from __future__ import annotations

from collections.abc import Callable

#: ``progress(description, done, total)``: ``done`` of ``total`` units of the named pass are finished
ProgressFn = Callable[[str, int, int], None]

#: ``on_message(text)``: one finished line of information (an epoch's summary, a stage's result)
MessageFn = Callable[[str], None]
