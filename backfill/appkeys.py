"""Which apps' ``api_key`` the API refused in a run whose token was checked first.

Theory of operation.  The CLI probes the token before a run (``backfill check``'s call: the
status of an unknown id answers 404 with a good token, 401 with a bad one).  After that, a 401
at a POST can only be about the one thing in its body the probe did not check: the app's
``api_key``.  ``AppKeys.submit`` turns that 401 into ``AppKeyRefusedError`` (a window that
cannot be done as asked: FAILED, not retryable, a person must fix the key; ``backfill retry``
takes it back), fails every later window of that app the same way without a call, and lets the
other apps go on.  An app's key is known only at its first POST, so until one POST of an app
has been answered, that app's POSTs go one at a time: a bad key costs one request, not one
per slot.  Without a probe (the engine used on its own), no ``AppKeys`` is made and a 401
stops the run as a refused token (``AuthError``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from backfill.errors import AuthError, Stopped, WindowFailedError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from backfill.models import Window

__all__ = ["AppKeyRefusedError", "AppKeys"]


class AppKeyRefusedError(WindowFailedError):
    """The API refused the ``api_key`` of an app (401 at a POST) though the token is good."""


class AppKeys:
    """The apps whose key the API accepted or refused in this run (shared by its workers)."""

    def __init__(self) -> None:
        self._accepted: set[str] = set()
        self._refused: set[str] = set()
        self._first: dict[str, anyio.Lock] = {}  # held by an app's POST until one is answered

    @property
    def refused(self) -> frozenset[str]:
        """The apps whose key was refused in this run."""
        return frozenset(self._refused)

    async def submit(
        self, window: Window, post: Callable[[], Awaitable[str]], stopping: anyio.Event
    ) -> str:
        """``await post()`` (the POST of ``window``); returns its request id.

        Raises ``AppKeyRefusedError`` when the API refuses the app's key now (401) or refused
        it earlier in the run (then without a call), and ``Stopped`` when the run began
        stopping while this POST waited for the app's first answer (nothing was sent).
        """
        app = window.app
        if app not in self._accepted:
            async with self._first.setdefault(app, anyio.Lock()):
                if app in self._refused:
                    raise _refused(window, earlier=True)
                if app not in self._accepted:
                    if stopping.is_set():
                        raise Stopped(f"not submitted: the run is stopping ({app})")
                    try:
                        request_id = await post()
                    except AuthError as exc:
                        self._refused.add(app)
                        raise _refused(window, earlier=False) from exc
                    self._accepted.add(app)
                    return request_id
        return await post()  # a 401 now, the key once accepted: the token itself (fatal)


def _refused(window: Window, *, earlier: bool) -> AppKeyRefusedError:
    app = window.app
    when = " at an earlier request of this run; not submitted" if earlier else ""
    return AppKeyRefusedError(
        f"the API refused the key of app '{app}' (401){when}: the token is good, so check "
        f"api_key of app '{app}' in the config, then `backfill retry --app {app}`",
        app=app,
        window=window.label,
    )
