"""python-can interfaces the project ships, registered through the ``can.interface`` entry point group."""
