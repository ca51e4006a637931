from switchall.cli import run

run()
