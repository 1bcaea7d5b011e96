"""The REAPER ReaScripts (Lua), shipped as package data for `stemquery install-reaper`."""
