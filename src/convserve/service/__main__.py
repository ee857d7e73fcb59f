"""``python -m convserve.service``: the server process ``convserve serve`` runs in its place
(``entry.py``)."""

from convserve.service.entry import main

main()
