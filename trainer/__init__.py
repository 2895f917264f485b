"""lightspan.trainer"""
