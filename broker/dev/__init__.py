"""Development tools: the one-process demo and the simulated factory (birth certificates).

May import anything; nothing in the broker imports it except the CLI.
"""
