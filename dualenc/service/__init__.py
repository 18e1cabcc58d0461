"""The search service: a web page and a JSON API over a trained run and a gallery's index.

``python search.py --serve`` runs it (`server.serve`); `app.create_app` builds the ASGI app
that tests and other servers can mount. One module per concern: `inputs` checks what requests
carry, `batching` shares each encoder between request threads, `searcher` ranks, `images`
serves gallery thumbnails by id, `static/` holds the page.
"""
