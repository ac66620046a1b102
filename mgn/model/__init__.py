"""The networks (the image-only student, the guidance path), the training objectives, the exported student.

May import: mgn's top level, mgn.io and mgn.data.
"""
