"""Networks only (nn.Modules): they know tensors, never files or configs on disk."""
