"""casengine's storage backends, one module each, found by URL scheme (see casengine.backend)."""
