"""The run as stages, each a module that imports only stages before it:

``plan`` (data, grid -> groups of model x fold cells) -> ``passes`` (backbone passes through the
content-addressed ``store``) -> ``fit`` / ``predict`` / ``evaluate`` (one cell) -> ``finish``
(aggregate, validate, select, write); ``runner`` drives them with an executor (``executors``)
and a ``journal`` that makes every finished cell survive a crash.
"""
