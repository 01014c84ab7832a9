"""`gpt-explain`, the front door (`cli.py`) over `gpt2np.inside`, which gathers what GPT-2 does with a
prompt and renders it as one page (gpt-serve's playground shows the same page)."""
