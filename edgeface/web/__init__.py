"""The door owner's web app (`edgeface web`): its own process, reading the daemon's state files and its MQTT events.

See docs/web.md for why it is a separate process and how it never makes the door wait.
"""
