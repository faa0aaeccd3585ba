from amlfs_cli.main import app

app()
