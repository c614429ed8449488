"""The browser app over the personalize library: train a concept, generate with it, evaluate it, manage the library.

Launch with `personalize app` (see app/command.py); `app.ui.build_app(AppState.open(...))` builds the Blocks.
"""
