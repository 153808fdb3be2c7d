"""The hub's dashboard: server-rendered pages of the fleet, models, drift and experiments.

    from hub.dashboard import mount
    mount(app, hub)          # the pages at /, /login, /models, /drift, /experiments

Modules: `session` (pure: the signed session cookie), `svg` (pure: line charts as inline SVG),
`views` (pure: the hub's data -> what each page shows), `data` (the registry and fleet reads
behind each page), `routes` (FastAPI routes, Jinja2 templates in `templates/`, the stylesheet
in `static/`).
"""

from hub.dashboard.routes import mount

__all__ = ["mount"]
