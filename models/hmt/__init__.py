"""HMT, the hierarchical memory transformer (arXiv 2405.06067): a segment-recurrent wrapper around
any pattern stack. ``config.py`` is the ``model.hmt`` section, ``model.py`` the model; the README
section "HMT" says how to train, generate and export it."""
