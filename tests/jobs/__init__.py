"""Scripts that tests run as processes of their own, from the repository
root: `python -m tests.jobs.<name> ...` (see each script's docstring), and
`processes`, the helpers that start and watch them."""
