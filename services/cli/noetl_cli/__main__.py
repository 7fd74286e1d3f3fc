"""`python -m noetl_cli ...` = `noetl ...` (scripts that hold an interpreter path, not the venv's bin)."""
from noetl_cli.main import main

main()
