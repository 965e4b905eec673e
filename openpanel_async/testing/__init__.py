"""Tools for testing code that uses openpanel-async, without an OpenPanel account.

:class:`LocalOpenPanel` is a real HTTP server on 127.0.0.1 that speaks the OpenPanel
ingestion contract and records what it receives; point the client's ``api_url`` at its
``url``. :class:`Reply` scripts how it answers the next requests.

:class:`EventRecorder` is a transport that captures events with no network at all:
``OpenPanel(client_id=..., transport=EventRecorder())``.
"""

from ._recorder import EventRecorder, RecordedRequest
from ._server import LocalOpenPanel, ReceivedRequest, Reply

__all__ = ["EventRecorder", "LocalOpenPanel", "ReceivedRequest", "RecordedRequest", "Reply"]
