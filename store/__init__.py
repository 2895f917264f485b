"""lightspan.store"""
