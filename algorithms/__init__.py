"""lightspan.algorithms"""
