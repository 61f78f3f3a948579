"""The operator's web dashboard, served by `edgefleet fleet serve` under `/ui/` (docs/dashboard.md).

Server-rendered Jinja2 pages with htmx (vendored in `static/`) for the parts that refresh;
charts are SVG drawn on the server from the fleet's own data. The slice:

- `sessions`: server-side login sessions (random cookie token, never the API key);
- `security`: session, role and CSRF checks, form parsing, the page renderer, error pages;
- `charts`: geometry and colours of the SVG charts (heat map, histograms, status bars);
- `views`, `rollout_views`, `drift_views`: view models built from the store and the telemetry;
- `routes_*`: the pages and actions; `mount.install_dashboard(app)` wires them into the app.

This package's `__init__` imports nothing, so any module of it can be imported first.
"""
