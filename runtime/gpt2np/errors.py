"""The one exception type the runtime raises for bad input (files, configs, arguments)."""


class GPT2Error(Exception):
    """A problem with the user's input: a model folder, a prompt, an option.

    The message is one line meant for a human; the CLI prints it and exits non-zero.
    """
