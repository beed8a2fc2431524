"""The service's defaults, shared by the app and the command line (no imports: the parser stays light)."""

DEFAULT_WINDOW_MS = 5.0  # how long the batcher waits for more images while others are still being decoded
DEFAULT_MAX_BATCH = 16  # most images per network call
DEFAULT_MAX_PENDING = 32  # screening requests in progress at once; more get 503 with Retry-After
DEFAULT_CONCURRENCY = 2  # uploads decoded at the same time
