from qcli.launch import main

main()
