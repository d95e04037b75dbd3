"""The web app: :class:`~diffgeo.ui.session.Session` (what each action runs, Gradio-free) and
:mod:`~diffgeo.ui.app` (the Gradio page). Start it with ``diffgeo ui``."""

from diffgeo.ui.session import Run, Session

__all__ = ["Run", "Session"]
