"""The web console (docs/console.md): server-rendered pages at `/`, composed into every mode's app by
noetl_frontend.app.build_api. `data` reads, `views` derives what the pages show from the events, `graph`
lays out and draws a playbook, `routes` serves the pages and actions, `live` the server-sent events."""
