from convserve.cli import app

app()
