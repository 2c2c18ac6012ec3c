"""The compiler wing: build file and target in, passes run in order, bundle out
(docs/ARCHITECTURE.md)."""
