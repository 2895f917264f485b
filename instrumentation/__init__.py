"""lightspan.instrumentation"""
