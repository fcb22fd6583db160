"""Server interceptors: auth, logging, rate limiting and deadlines, one job each."""
