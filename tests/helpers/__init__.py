"""What the tests build and run against: OpenAI-style TensorFlow checkpoints, the TensorFlow
reference model, a loopback HTTP server with injected faults, a gpt-serve process, and
sampling's reference views. Imported as `helpers.<module>`."""
