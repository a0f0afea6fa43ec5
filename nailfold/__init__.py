"""nailfold — real-time nailfold capillaroscopy analyzer.

Packages: ``stream`` (sources, wire protocol, grabber, analysis stage), ``models`` (networks,
training, inference backends), ``ui`` (Gradio dashboard), ``biopsy`` (skin-biopsy analyzer),
``configs`` (YAML). This package holds the ``nailfold`` command, configuration and shared helpers.
"""
__version__ = "0.1.0"
