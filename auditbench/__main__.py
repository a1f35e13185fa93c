from auditbench.cli import app

app(prog_name="auditbench")
