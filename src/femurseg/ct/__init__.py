"""CT: Hounsfield units, femur crop boxes, the periosteal/endosteal cascade of paper 003 (train, predict,
evaluate as separate modules), femur regions and bone measurements.
"""
