"""The stages of the InstructGPT pipeline, one module each (no stage imports another): see lmforge.pipeline."""
