"""The web face of a server: one HTTP listener for the page, the JSON API, /metrics,
resumable downloads, .torrent files and a BitTorrent tracker (docs/http.md).

This floor sits above the server engine and is started by the programs; the
engine knows nothing of it.
"""
