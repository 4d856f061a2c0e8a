"""Samplers behind each job kind. They take a loaded model, validated parameters and arrays, and a JobContext;
they write result files into the context's folder and nothing else (no global state, no side effects in
constructors)."""
