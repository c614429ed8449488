"""One module per tab of the app; each exposes `build(state)` that creates its components and events."""
