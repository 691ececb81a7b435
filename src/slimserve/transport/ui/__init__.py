"""The web console at GET /ui: a static page (HTML, JS, CSS shipped in this package) and the
JSON endpoints it reads.

  GET /ui                                     the page (no data in it; no key needed)
  GET /ui/static/NAME                         its scripts, styles and the vendored uPlot
  GET /ui/api/session                         who the key is: scopes, models (any valid key)
  GET /ui/api/models                          models, versions, variants (scope `infer`)
  GET /ui/api/live                            the /metrics figures now (scope `metrics`)
  GET /ui/api/reports                         optimize reports (scope `metrics`)
  GET /ui/api/reports/MODEL/VERSION/plot      a report's report.png (scope `metrics`)

Everything else the page does goes through the public APIs with the same key: inference
(`/v2/models/M/infer`, `/v1/chat/completions`) and management (`/v2/repository/models/M/load`).
The page sends the key as `Authorization: Bearer`, never in a URL, which is why live figures
are polled with fetch rather than streamed with EventSource (it cannot send headers).
"""

from slimserve.transport.ui.routes import ConsoleApp

__all__ = ["ConsoleApp"]
