"""planc's compiler: the plan IR, validation, the model front end, the driver and the CLI.

Installed as `planc.compiler`; the Python API is the top-level `planc` package (`compiler/api/`).
"""
