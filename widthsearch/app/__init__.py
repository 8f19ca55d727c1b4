"""The application floor of widthsearch: what runs a search on top of the library (`widthsearch/*.py`) and its
plug-ins (`searchers/`, `trainables/`). Nothing below imports it.

    api         `Search` and `load_search`: the whole workflow of an experiment, from Python
    cli         the `widthsearch` command line (parses, calls the API, prints)
    config      `SearchConfig`: every search setting, declared once
    experiment  a prepared experiment (data, base model, width space, measure)
    runs        the Ray Tune runs of an experiment (search and its parts, re-scoring, retraining)
    callbacks   the driver's Tune callbacks: result rows, progress bars
    tuning      Ray and Ray Tune set-up: console output, interrupts
"""
