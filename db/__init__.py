"""bitplan's persistence: tables, sessions, migrations, repositories and the artifact store.

The service, the workers and the CLI all keep state through this package, so it must stay
importable from any of them: it never imports FastAPI, Celery or torch, and `allocator/` never
imports it. Import the submodules directly (`db.repositories`, `db.store`); this file
re-exports nothing, so importing the store does not pull in SQLAlchemy.
"""
