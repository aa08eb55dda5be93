"""Guest images built offline from Debian packages."""
