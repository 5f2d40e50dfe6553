"""OpenAI-compatible serving: protocol, engine, batcher, HTTP app, Ray Serve wrapper, chat command.

Importing this package loads neither Ray nor torch; the modules import what they need.
"""
