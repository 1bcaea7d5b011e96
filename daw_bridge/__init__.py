"""The DAW side of stemquery: CLI, server (OSC, hot folders, job journal) and REAPER helpers.

It reaches the model only through `stemquery.model.Separator`.
"""
