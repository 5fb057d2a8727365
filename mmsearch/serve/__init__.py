"""`mmsearch serve`: a JSON API and a web page over the same search layer (see ``app``)."""
