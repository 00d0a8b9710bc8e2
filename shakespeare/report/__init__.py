"""The report over a folder of runs: `python -m shakespeare.report FOLDER`."""
