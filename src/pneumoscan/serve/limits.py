"""The service's defaults, shared by the app, the server and the command line (no imports: the parser stays light).

Every bound a client can push against is here, with the value ``pneumoscan serve --help`` shows.
"""

DEFAULT_WINDOW_MS = 5.0  # how long the batcher waits for more images while others are still being decoded
DEFAULT_MAX_BATCH = 16  # most images per network call
DEFAULT_MAX_PENDING = 32  # screening requests in progress at once; more get 503 with Retry-After
DEFAULT_CONCURRENCY = 2  # uploads decoded at the same time
DEFAULT_MAX_UPLOAD_MB = 20.0  # larger uploads get 413
DEFAULT_UPLOAD_TIMEOUT = 60.0  # seconds to receive an upload's body; slower ones get 408
DEFAULT_DRIFT_WINDOW = 200  # screened images the drift gauges of /metrics cover (0: no drift gauges)

# Connections (the server, before any request reaches the app)
DEFAULT_HEADER_TIMEOUT = 30.0  # seconds from the first byte of a request to the end of its headers; then closed
DEFAULT_KEEP_ALIVE = 5.0  # seconds an idle connection (new, or between requests) stays open
DEFAULT_MAX_CONNECTIONS = 128  # open connections plus requests in flight; beyond it requests get 503
DEFAULT_MAX_HEADER_KB = 16  # request line plus headers; larger ones get 431 and the connection is closed
